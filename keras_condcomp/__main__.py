import sys

from keras_condcomp.cli import console_main

sys.exit(console_main())
