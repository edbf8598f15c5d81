from lora_trainer.cli import main

raise SystemExit(main())
