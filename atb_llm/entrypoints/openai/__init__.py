"""OpenAI-compatible HTTP server and web chat page: `bash examples/server/run_server.sh -m WEIGHT_DIR`."""
