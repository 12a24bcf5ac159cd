"""Tool definitions shared by the function-calling tests."""

from __future__ import annotations

# A tool whose arguments a random model can only write validly under the grammar: an enum
# and a bounded integer, both required.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
