"""The served app: ``dermpipe serve --model BUNDLE`` (a page and a JSON API over one loaded pipeline)."""
