"""The command line, the menu, the web dashboard and the demo."""
