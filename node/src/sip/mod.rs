//! SIP: messages, sans-IO transactions and dialogs, SDP, and the UDP driver.
