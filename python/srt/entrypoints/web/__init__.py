"""What `srt serve` shows a browser (main process): the chat page at / (`pages`), the API docs at
/docs and /redoc, served offline (`pages`), and the request bodies in the OpenAPI document
behind them (`openapi`). The page's files live in `static/`, shipped in the package."""
