"""The compression engine: plain library code. Each job kind is a function
``run(spec, ctx) -> result`` registered in ``workers.engine.registry``; tests call them directly
with a :class:`~workers.engine.context.LocalContext`."""
