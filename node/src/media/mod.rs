//! Media: audio preparation, G.711, RTP, DTMF and the pacer.
