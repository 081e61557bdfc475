"""The leader's durable state: the store, its values, the event journal and history."""
