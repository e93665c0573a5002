"""The Ray room: the runtime env, the trainable and its tuner, the relay, the Ray Jobs client.
Only this folder imports ray."""
