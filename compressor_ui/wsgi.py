import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "compressor_ui.settings")
application = get_wsgi_application()

# What the pages import on first use, imported while the web worker boots instead: the recipe
# module (the job page and the forms need it; it pulls in torch, seconds of start-up) and the plotly
# chart builders. Otherwise the first requests of every worker wait for these imports.
import compression.recipe  # noqa: E402,F401
import jobs.charts  # noqa: E402,F401
