from berth.cli.main import main

raise SystemExit(main())
