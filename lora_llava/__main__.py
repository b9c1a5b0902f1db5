"""``python -m lora_llava VERB ...`` is the ``lora-llava`` command: what ``torchrun ... -m lora_llava train ...``
and ``accelerate launch -m lora_llava train ...`` start on each process."""

from lora_llava.cli.main import main

raise SystemExit(main())
