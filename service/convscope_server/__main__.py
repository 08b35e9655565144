from convscope_server.app import main

raise SystemExit(main())
