"""image-captioning: caption photos with a CNN encoder and an LSTM decoder.

    python image_captioning.py            # the menu
    python image_captioning.py --help     # the commands
"""
import sys

from captioning.cli import main

if __name__ == "__main__":
    sys.exit(main())
