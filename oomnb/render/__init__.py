"""Reports rendered for people: text and HTML (the lab extension renders the JSON itself)."""
