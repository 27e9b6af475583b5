"""The engine: graphs, executors, serialization, scheduler, worker, client."""
