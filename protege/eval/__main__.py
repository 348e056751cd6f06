"""`python -m protege.eval MODEL_DIR --data test.jsonl ...`: see protege.eval.standalone."""

import sys

from protege.eval.standalone import main

sys.exit(main())
