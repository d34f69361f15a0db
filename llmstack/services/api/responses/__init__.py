"""`/v1/responses` (OpenAI's Responses API): `protocol` (request models), `items` (input items and their
chat messages), `builder` (the event sequence and the response object), `store` (stored responses),
`serving` (the work)."""
