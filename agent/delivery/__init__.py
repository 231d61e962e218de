"""Model delivery on the device: the updater worker, the resumable chunk pull, the model store,
slots, activation with probation and rollback, and the session that ties them to the link."""
