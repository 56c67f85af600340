"""image-captioning: caption photos with a CNN encoder and an LSTM decoder.

    python image_captioning.py            # the menu
    python image_captioning.py --help     # the commands
"""
from captioning.interfaces.cli import main
from captioning.utils import exit_process

if __name__ == "__main__":
    exit_process(main())
