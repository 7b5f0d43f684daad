from metrics_service.cli import main

raise SystemExit(main())
