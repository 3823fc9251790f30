"""The data-card template and the cards of the data polyalign ships (read by `core/cards.py`)."""
