from d3builder.cli import main

raise SystemExit(main())
