"""Services: what Lightbox does, independent of the protocol that asked for it."""
