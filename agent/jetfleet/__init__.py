"""jetfleet, the operator's side: the MQTT client, the fleet view, push, rollback and rollouts,
progress display, the model repository and the model server, and its command line."""
