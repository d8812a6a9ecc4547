from codetrain.cli import main

raise SystemExit(main())
