"""The embeddable chat widget: /embed.js (the <parley-chat> element) and what it asks the server."""
