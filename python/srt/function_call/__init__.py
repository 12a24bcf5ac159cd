"""Function calling for /v1/chat/completions (main process).

- `json_scan`: reading tool-call JSON while it is still being written;
- `formats`: the models' tool-call conventions (hermes, llama3_json, mistral, pythonic): parse
  outputs, describe calls as xgrammar structural tags, write tools as plain text;
- `tools`: the request side: validated tools and tool_choice, the grammar that enforces them,
  messages with tool calls rendered for the chat template (or as text, for templates without
  tool support);
- `stream`: an output turned into content and tool calls, all at once or as stream deltas.
"""
