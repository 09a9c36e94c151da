"""memplug's servers, for agents that do not import Python: ``memplug serve`` (the HTTP API,
:mod:`memplug.server.http`) and ``memplug mcp`` (:mod:`memplug.server.mcp`), with API keys per
tenant (:mod:`memplug.server.keys`). They need the ``server`` extra (FastAPI, uvicorn, the MCP SDK);
importing ``memplug`` or this package loads none of them."""
