"""The built-in small target: a seeded random LLaMA, its shipped tokenizer and demo prompts."""
