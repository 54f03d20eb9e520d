"""The kinds of counted events (clicks, impressions): each is a writer, a
reader and a storage write behind one interface; the registry lists them."""
