"""The registry's result codes (GSMA IMEI Database style), shared by its service, its
disputes and its HTTP layer."""

NOT_OWNER = "0002"  # only the owner removes its record
NO_RECORD = "0003"  # no such (open) record
UNKNOWN_REASON = "0010"  # a reason outside the agreed list
MALFORMED = "0011"  # a malformed field
ALREADY_OPEN = "0012"  # this operator already has an open record for the device
OWN_RECORD = "0013"  # a sighting of the reporter's own tracked device (it stays at home)
SEEN_AT_OUT_OF_RANGE = "0014"  # a sighting's time in the future or too old
