from efficientbioai.cli import main

raise SystemExit(main())
