"""The ASGI example: the app of ``workerbus demo --asgi``, shipped in shared/tools/asgi_app.py.

One app, two names: the code lives in the package (so the demo runs from an install, not
only from a checkout) and this module keeps ``uvicorn examples.asgi_app:app --workers 4``
(the commands in README.md, docs/embedding.md and the tests) working. Read the code, the
endpoints and the settings there.
"""

from shared.tools.asgi_app import app

__all__ = ["app"]
