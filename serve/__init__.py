"""The OpenAI-compatible HTTP server face (`moecoder serve`); talks to the model only through assistant."""
