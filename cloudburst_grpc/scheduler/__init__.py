"""The scheduler: function and DAG registration, validation, and placement of calls."""
