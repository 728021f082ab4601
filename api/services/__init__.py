"""Business rules and persistence. Keyword-only functions; routes hold no queries.

Every function that changes data commits first and publishes its events after, so a
rolled-back change never reaches a subscriber.
"""
