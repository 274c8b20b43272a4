"""The WSGI entry point gunicorn serves: ``gunicorn wsgi:app``."""

from imgproc import create_app

app = create_app()
