from sdrt.cli import main

raise SystemExit(main())
