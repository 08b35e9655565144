"""Images made by gradient steps on the input with the weights frozen (CS231n "Visualizing and
Understanding", second half): class and feature visualisation, feature inversion, DeepDream, texture
synthesis and style transfer. Adversarial examples live beside them in ``gradient/adversarial.py``."""
