# convscope server image. Stage 1 builds the default model; the runtime stage has the server, onnxruntime
# and torch + onnx2pytorch for gradient methods (drop "gradient" below for a forward-only image).
#   docker build -t convscope .                       (CPU onnxruntime)
#   docker build -t convscope-gpu --build-arg ORT=gpu .   (onnxruntime-gpu; run with a GPU reservation)
FROM python:3.11-slim AS model
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clients clients
COPY service service
COPY models models
RUN pip install --no-cache-dir ".[server,cpu,build]" && python models/build_efficientnet_lite0.py

FROM python:3.11-slim
ARG ORT=cpu
# ",distributed" adds Ray (docker-compose.yml's Ray head, workers and the server driving them)
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clients clients
COPY service service
RUN pip install --no-cache-dir ".[server,gradient,${ORT}${EXTRAS}]"
COPY --from=model /src/models /models
EXPOSE 50051
RUN mkdir -p /datasets /galleries
# The server binds 127.0.0.1 by default; in a container it must listen on the container's interface for
# the published port to reach it. Add --tls-cert/--tls-key (mounted files) and CONVSCOPE_TOKEN_FILE when
# the port is reachable from other machines.
ENTRYPOINT ["convscope-server", "--host", "0.0.0.0", "--repository", "/models", "--port", "50051", \
            "--data-root", "/datasets", "--gallery-root", "/galleries"]
