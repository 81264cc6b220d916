"""Celery app and tasks (thin), and the compression engine they call (``workers.engine``)."""
