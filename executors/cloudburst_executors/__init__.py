"""The executor service: runs user functions and DAG stages on a thread pool."""
