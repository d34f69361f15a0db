"""Text pieces every engine shares: chat templates (`templates`) and token-to-text decoding (`decoding`)."""
