from ghost_deploy.cli import main

main()
