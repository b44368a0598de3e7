"""Start HSCR Studio: ``python app.py`` serves the app on http://127.0.0.1:7860.

With no arguments it builds the embedded demo (phantom dataset and demo model) on first start.
"""

import sys

from app.main import main

if __name__ == "__main__":
    sys.exit(main())
