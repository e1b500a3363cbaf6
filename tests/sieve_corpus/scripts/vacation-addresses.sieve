# RFC 5230 4.5: :addresses lists the user's other addresses
require "vacation";
vacation :addresses ["postmaster@example.org", "someone-else@example.net"]
         "Answered when sent to one of my addresses.";
