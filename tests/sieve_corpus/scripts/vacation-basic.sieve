# RFC 5230 4: the default period (7 days), the answer decided per message
require "vacation";
vacation "I am away until Monday.";
