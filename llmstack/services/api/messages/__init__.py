"""`/v1/messages` (Anthropic's Messages API): `protocol` (request models, content blocks), `builder`
(the event sequence and the message), `errors` (Anthropic's error shape), `serving` (the work)."""
