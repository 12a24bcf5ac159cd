"""Structured output: grammars (JSON schema, regex) that constrain sampling, via xgrammar."""
