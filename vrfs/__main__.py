from vrfs.cli import main

raise SystemExit(main())
