import sys

from keras_condcomp.cli import main

sys.exit(main())
