from fltac.cli import main

raise SystemExit(main())
